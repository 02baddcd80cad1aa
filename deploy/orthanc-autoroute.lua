-- osteonode auto-routing for Orthanc (Lua).
--
-- When a study has received no new instance for StableAge seconds, Orthanc
-- sends its CT series, in one asynchronous store job, by C-STORE to the DICOM
-- modality named "osteonode" (declared in DicomModalities of the Orthanc
-- configuration, or with PUT /modalities/osteonode). osteonode chooses one
-- series of the study and answers later with one SEG, SR, key images and PDF
-- in the same study.
--
-- No loop: the results make the study change and become stable again, so
-- OnStableStudy runs again; but only CT series that were not sent yet, or
-- that received new instances since, are sent (the table "routed" remembers
-- the instance count sent per series), and the results are not CT (SEG, SR,
-- OT, DOC). "routed" lives in Orthanc's Lua engine: after an Orthanc restart a
-- study that becomes stable again is sent once more, which osteonode receives
-- without analysing it again (its series are unchanged).
--
-- Load it with "LuaScripts": ["orthanc-autoroute.lua"] in the Orthanc
-- configuration (see deploy/orthanc.json and docs/admin.md).

OSTEONODE_MODALITY = 'osteonode'

routed = {}  -- Orthanc series ID -> number of its instances already sent to osteonode

function OnStableStudy(studyId, tags, metadata)
   local resources = {}
   for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
      local count = #series['Instances']
      if series['MainDicomTags']['Modality'] == 'CT' and routed[series['ID']] ~= count then
         table.insert(resources, series['ID'])
         routed[series['ID']] = count
      end
   end
   if #resources == 0 then
      return
   end
   -- Queue an asynchronous store job (visible in /jobs); a synchronous call
   -- would block Orthanc's Lua engine for the whole transfer.
   local request = {}
   request['Resources'] = resources
   request['Asynchronous'] = true
   local answer = ParseJson(RestApiPost('/modalities/' .. OSTEONODE_MODALITY .. '/store',
                                        DumpJson(request)))
   print('osteonode auto-routing: ' .. #resources .. ' CT series of study ' .. studyId ..
         ' queued as job ' .. answer['ID'])
end
